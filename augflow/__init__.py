"""augflow: privacy-preserving data augmentation for medical imaging with class-conditional flows."""

__version__ = "0.1.0"
