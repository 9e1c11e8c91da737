"""The offline trainer: CLIP2Scene distillation and label-efficient fine-tuning from rosbags.

Installed as ``clip2scene_ros.training`` (source folder ``training/`` at the repository root).
It imports the core and the codecs, never rclpy.
"""
