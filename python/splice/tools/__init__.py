"""What drives a patched model to measure or train: profiling, router training, draft search, sensitivity, calibration data."""
