"""Loading: models in every input form, example inputs, calibration data."""
