"""Catalogs and the files between stages: labels.csv, images, datasets, the image cache, EMB.h5, the demo catalog."""
