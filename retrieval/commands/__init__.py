"""One module per `retrieval` command: an argument parser and main(argv), nothing else; `argtypes` holds
the argument types they share."""
