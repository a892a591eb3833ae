"""captum-fullgrad: full-Jacobian (FullGrad) attributions for Captum.

The data path reads in one direction: the model's operations are captured
(:mod:`~captum_fullgrad.capture`; repeated calls replay a capture plan,
:mod:`~captum_fullgrad.replay`), decomposed into eq. 1's full-Jacobian
(:mod:`~captum_fullgrad.decomposition`), aggregated into eq. 4's saliency map
(:mod:`~captum_fullgrad.aggregation`) and offered as a Captum attribution
(:class:`FullGradient`).
"""

from .decomposition import FullJacobian, full_jacobian
from .full_gradient import FullGradient

__version__ = "0.1.0"

__all__ = ["FullGradient", "FullJacobian", "full_jacobian", "__version__"]
