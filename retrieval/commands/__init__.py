"""One module per `retrieval` command: an argument parser and main(argv), nothing else."""
