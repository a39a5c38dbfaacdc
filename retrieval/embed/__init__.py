"""Running a model over a catalog: outputs, and the EMB.h5 writer."""
