"""ttp-ray: predict fine-tuning training time without training (linearised NTK dynamics), swept on Ray."""

__version__ = "0.1.0"
