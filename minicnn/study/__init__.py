"""Tools for studying a trained network (``minicnn visualize``; ``minicnn trace`` is
minicnn/trace.py).

- gradients.py:   input gradients by minicnn's own backward: the plain gradient,
                  SmoothGrad, gradient x input.
- activations.py: each conv layer's output for an image, and the patch of the
                  image each of its pixels depends on.
- figures.py:     the figures, with matplotlib (the optional extra minicnn[plot]).
- report.py:      the panels with their captions, as PNG files or one HTML page.
"""
