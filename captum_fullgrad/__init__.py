"""captum-fullgrad: full-Jacobian (FullGrad) attributions for Captum."""

__version__ = "0.1.0"
