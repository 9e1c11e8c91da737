"""Open-vocabulary LiDAR semantic segmentation distilled from CLIP (CLIP2Scene) for ROS 2."""

__version__ = "0.1.0"
