// Label review shortcuts: j/k (or arrows) move between issues, a/r/s decide the focused one.
(function () {
  document.querySelectorAll('select.autosubmit').forEach((el) =>
    el.addEventListener('change', () => el.form.submit()));
  const cards = Array.from(document.querySelectorAll('.issue'));
  if (!cards.length) return;
  let at = 0;
  function focus(i) {
    at = Math.max(0, Math.min(cards.length - 1, i));
    cards.forEach((c, n) => c.classList.toggle('focused', n === at));
    cards[at].scrollIntoView({block: 'nearest'});
  }
  cards.forEach((c, n) => c.addEventListener('click', () => focus(n)));
  const keys = {a: 'accept', r: 'reject', s: 'skip'};
  document.addEventListener('keydown', (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || /INPUT|SELECT|TEXTAREA/.test(e.target.tagName)) return;
    if (e.key === 'j' || e.key === 'ArrowDown') { focus(at + 1); e.preventDefault(); return; }
    if (e.key === 'k' || e.key === 'ArrowUp') { focus(at - 1); e.preventDefault(); return; }
    const decision = keys[e.key];
    if (!decision) return;
    const button = cards[at].querySelector(`button[value="${decision}"]`);
    if (button && !button.disabled) { button.click(); e.preventDefault(); }
  });
})();
