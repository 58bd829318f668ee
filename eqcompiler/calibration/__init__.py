"""Calibration: statistics of the fp32 artifact on data (observers, streaming, layer streams, ranks),
and the model runs whose results passes read as data (layer sensitivity)."""
