"""Calibration geometry: rigid transforms, camera models, projection, point–pixel pairs, ego motion."""
