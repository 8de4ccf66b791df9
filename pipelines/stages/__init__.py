"""One module per stage: wiring of a library step into the run store."""
