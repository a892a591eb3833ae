"""The tiny evaluation run the suite's tests share (see conftest.py)."""

#: Generated scenes.
N = 6
#: Methods evaluated (the three controls are added).
METHODS = ["fullgrad", "gradcam", "saliency"]
