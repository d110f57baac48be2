"""Readers and writers: raster images, DICOM, data set layouts, and atomic stage outputs."""
