"""clip2scene_ros: an ament_python ROS 2 package that is also a plain pip distribution."""

from pathlib import Path

from setuptools import find_packages, setup

PACKAGE = "clip2scene_ros"
ROOT = Path(__file__).parent


def tree(folder: str) -> list[tuple[str, list[str]]]:
    """data_files entries that install ``folder`` recursively under share/<package>/."""
    entries: dict[str, list[str]] = {}
    for path in sorted((ROOT / folder).rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            rel = path.relative_to(ROOT)
            entries.setdefault(f"share/{PACKAGE}/{rel.parent}", []).append(str(rel))
    return sorted(entries.items())


setup(
    name=PACKAGE,
    version="0.1.0",
    # The offline trainer lives in training/ at the repository root (the design card's layout);
    # clip2scene_ros/training is a relative symlink to it, so it installs as
    # clip2scene_ros.training in a wheel, a pip editable install and `setup.py develop` alike
    # (colcon --symlink-install), and no generic top-level `training` package lands anywhere.
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        *tree("launch"),
        *tree("config"),
    ],
    include_package_data=True,
    python_requires=">=3.10",
    # ROS 2 client libraries (rclpy, message packages) are deliberately absent: they come from
    # the system ROS 2 install on a vehicle, or from requirements-ros.txt on the pip route.
    install_requires=[
        "numpy>=1.24",
        "pillow>=9",
        "pyyaml>=6",
        "rosbags>=0.10",
        "safetensors>=0.4",
        "torch>=2.1",
        "tqdm>=4.60",
    ],
    extras_require={
        "clip": ["open_clip_torch>=2.24", "torchvision"],
        "export": ["onnx>=1.15", "onnxruntime>=1.17"],
        "pointclip": ["trimesh>=4"],
        "report": ["matplotlib>=3.7"],
        # the TensorRT backend drives 10.x and 11.x (runtime/tensorrt_backend.py,
        # TENSORRT_REQUIREMENT); it needs an NVIDIA GPU and model.onnx (the export extra)
        "tensorrt": ["tensorrt>=10.0,<12", "onnx>=1.15"],
        # TensorBoard logs of `clip2scene train`; the trainer warns once and runs without it
        "train": ["tensorboard>=2.14"],
    },
    zip_safe=True,
    maintainer="clip2scene_ros developers",
    maintainer_email="clip2scene-ros@example.org",
    description="Open-vocabulary LiDAR segmentation distilled from CLIP, as a ROS 2 node",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "clip2scene = clip2scene_ros.cli:main",
            "clip2scene_node = clip2scene_ros.node.node:main",
            "clip2scene_lifecycle_node = clip2scene_ros.node.lifecycle_node:main",
        ],
    },
)
