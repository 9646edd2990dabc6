"""One module per sub-command; heavy libraries are imported inside command bodies."""
