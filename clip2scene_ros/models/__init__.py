"""3D networks and the model bundle they travel in."""
