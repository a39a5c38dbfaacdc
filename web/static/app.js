// Progressive enhancement only: every page works without JavaScript.
// Choosing a file submits the photo search; a photo dropped anywhere on the page does the same.
(function () {
  "use strict";
  const form = document.getElementById("photo-form");
  const input = document.getElementById("photo-input");
  const veil = document.getElementById("dropveil");
  const busy = document.getElementById("uploading");
  const zone = document.getElementById("dropzone");
  const ACCEPTED = ["image/jpeg", "image/png", "image/webp", "image/heic", "image/heif"];

  // on phones the facet groups start folded (those with a ticked label stay open)
  if (window.matchMedia("(max-width: 760px)").matches) {
    document.querySelectorAll("details.facet:not(.has-selection)").forEach(function (d) { d.open = false; });
  }

  function submitWith(targetForm, files) {
    if (!targetForm || !files || !files.length) return;
    const file = files[0];
    if (file.type && ACCEPTED.indexOf(file.type) < 0) {
      alert("Please choose a JPEG, PNG, WebP or HEIC photo (got " + file.type + ").");
      return;
    }
    const field = targetForm.querySelector("input[type=file]");
    if (field && field.files !== files) {
      const transfer = new DataTransfer();
      transfer.items.add(file);
      field.files = transfer.files;
    }
    if (busy) busy.hidden = false;
    targetForm.submit();
  }

  if (input) input.addEventListener("change", function () { submitWith(form, input.files); });
  document.querySelectorAll("input[data-autosubmit]").forEach(function (el) {
    el.addEventListener("change", function () { submitWith(el.form, el.files); });
  });

  const target = zone || form;
  if (!target || !(input || zone)) return;
  let depth = 0;
  function hasFiles(event) {
    return event.dataTransfer && Array.prototype.indexOf.call(event.dataTransfer.types, "Files") >= 0;
  }
  window.addEventListener("dragenter", function (event) {
    if (!hasFiles(event)) return;
    depth += 1;
    if (zone) zone.classList.add("over"); else if (veil) veil.hidden = false;
  });
  window.addEventListener("dragleave", function () {
    depth = Math.max(0, depth - 1);
    if (depth === 0) { if (zone) zone.classList.remove("over"); if (veil) veil.hidden = true; }
  });
  window.addEventListener("dragover", function (event) { if (hasFiles(event)) event.preventDefault(); });
  window.addEventListener("drop", function (event) {
    if (!hasFiles(event)) return;
    event.preventDefault();
    depth = 0;
    if (zone) zone.classList.remove("over");
    if (veil) veil.hidden = true;
    submitWith(target, event.dataTransfer.files);
  });
  // back/forward cache: hide the spinner when the page is shown again
  window.addEventListener("pageshow", function () { if (busy) busy.hidden = true; });
})();
