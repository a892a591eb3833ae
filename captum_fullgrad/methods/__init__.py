"""A registry of saliency methods with one output convention, for side-by-side comparisons.

Every method is a callable ``(model, inputs, target) -> Tensor`` that returns a
**non-negative saliency map of shape ``(B, 1, H, W)``**, float32, detached, on the
input's device: the method's conventional display form (for gradient-type methods the
absolute attribution summed over colour channels, for Grad-CAM the rectified and
upsampled class activation map, for FullGrad eq. 4's map). Comparison figures,
benchmarks and evaluation metrics can then treat all methods alike.

Built-in methods (see ``docs/methods.md`` for the defaults and the papers they follow):

=======================  ===========================================================
name                     what it computes
=======================  ===========================================================
``saliency``             ``|grad|``, max over channels (Simonyan et al., 2014)
``input_x_gradient``     ``|x * grad|`` summed over channels
``guided_backprop``      ``|guided backprop|`` summed over channels (Springenberg et al.)
``integrated_gradients`` ``|IG|`` summed over channels (Sundararajan et al., 2017)
``smoothgrad``           mean over noisy copies of ``|grad|``, summed over channels
                         (Smilkov et al., 2017)
``gradcam``              Grad-CAM on the last convolution, upsampled (Selvaraju et al.)
``fullgrad``             eq. 4 of Srinivas & Fleuret (2019), single channel
``fullgrad_bias``        eq. 4 without the input-gradient term (bias-Jacobians only)
``smoothfullgrad``       FullGrad averaged over noisy copies (NoiseTunnel)
=======================  ===========================================================

Each built-in has parameters with paper-following defaults; ``get_method(name, **params)``
gives a configured variant, :func:`resolve_methods` a checked list of them (what every
command and the evaluation suite use to read ``--methods``). A method is **one
declaration**: :func:`register_method` takes the function, its label and reference, the
checks of its parameters and its :class:`MethodTraits` (random or not, passes per image,
the parameters its time grows with, cheap settings for smoke runs). Code that needs to know
whether a method is slow or stochastic reads those traits, never the method's name.

Example::

    >>> from captum_fullgrad.methods import get_method, register_method, resolve_methods
    >>> ig = get_method("integrated_gradients", n_steps=20)
    >>> maps = ig(model, images, target=labels)          # (B, 1, H, W), >= 0
    >>> ig.passes, ig.stochastic, ig.cost_params         # (20, False, ('n_steps',))
    >>> @register_method("edges", label="Edges", checks={"power": is_non_negative})
    ... def edges(model, inputs, target, *, power=1.0):  # any (model, x, target) -> map
    ...     grad = inputs.diff(dim=-1, append=inputs[..., -1:]).abs()
    ...     return grad.sum(1, keepdim=True) ** power
    >>> resolve_methods("fullgrad,edges", params={"edges": {"power": 2.0}})
"""

from . import registry
from .builtin import find_last_conv, smoothing_noise
from .registry import (  # noqa: F401 (_REGISTRY, _check_*: read by tests and dataset_attribution)
    _REGISTRY,
    DEFAULT_TABLE5_METHODS,
    AttributionMethod,
    MapFunction,
    MethodsSpec,
    MethodTraits,
    ParameterCheck,
    _check_inputs,
    _check_output,
    available_methods,
    get_method,
    is_int_or_none,
    is_non_negative,
    is_one_of,
    is_optional,
    is_positive_int,
    register_method,
    resolve_methods,
    unregister_method,
)

# The registry's public names, and the two helpers of the built-in methods.
__all__ = [*registry.__all__, "find_last_conv", "smoothing_noise"]
