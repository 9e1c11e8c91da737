"""Calibration geometry: transforms, camera models, projection, point–pixel pairs, ego motion."""
