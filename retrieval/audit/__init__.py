"""Label audit: issues found out of sample, review decisions."""
