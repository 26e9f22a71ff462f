from setuptools import find_packages, setup

setup(
    name="mhe_scale",
    version="0.1.0",
    description="Classifiers over huge label spaces: Multi-Head Encoding heads, sharded heads, "
    "accelerate/DeepSpeed training, XMC and face recognition pipelines.",
    packages=find_packages(include=["mhe_scale", "mhe_scale.*"]),
    python_requires=">=3.10",
    # Ranges here; exact pins (torch==2.13.0 above all) live in constraints.txt.
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "omegaconf>=2.3",
        "PyYAML>=6",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "accelerate>=1.0",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6"],
    },
    entry_points={"console_scripts": ["mhe-scale=mhe_scale.cli:main"]},
)
