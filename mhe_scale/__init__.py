"""mhe_scale: classifiers over huge label spaces with Multi-Head Encoding heads."""

__version__ = "0.1.0"
