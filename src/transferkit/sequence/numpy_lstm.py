"""A reference LSTM cell in NumPy: the forward and backward pass of one time step, written to be read.

Shapes: batch N, input size D, hidden size H. The four gates share one matrix product
``a = x Wx + h_prev Wh + b`` of shape ``(N, 4H)``, split into the pre-activations of the input gate ``i``,
forget gate ``f``, output gate ``o`` and candidate ``g`` (this order)::

    i = sigmoid(a_i)   how much of the candidate to write
    f = sigmoid(a_f)   how much of the old cell state to keep
    o = sigmoid(a_o)   how much of the cell state to show
    g = tanh(a_g)      the candidate values
    c = f * c_prev + i * g          the cell state: the "gradient highway" (dc/dc_prev = f, no squashing)
    h = o * tanh(c)

The backward pass applies the chain rule to those five lines in reverse order. PyTorch's ``nn.LSTM`` uses
the gate order i, f, g, o and transposed weights; ``tests/test_sequence.py`` checks these gradients against
``torch.autograd``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class StepCache(NamedTuple):
    """What the backward pass needs from the forward pass."""

    x: np.ndarray
    h_prev: np.ndarray
    c_prev: np.ndarray
    i: np.ndarray
    f: np.ndarray
    o: np.ndarray
    g: np.ndarray
    c: np.ndarray
    Wx: np.ndarray
    Wh: np.ndarray


def lstm_step_forward(x: np.ndarray, h_prev: np.ndarray, c_prev: np.ndarray, Wx: np.ndarray, Wh: np.ndarray,
                      b: np.ndarray) -> tuple[np.ndarray, np.ndarray, StepCache]:
    """One step. ``x (N, D)``, ``h_prev, c_prev (N, H)``, ``Wx (D, 4H)``, ``Wh (H, 4H)``, ``b (4H,)``.

    Returns ``h (N, H)``, ``c (N, H)`` and the cache for :func:`lstm_step_backward`.
    """
    hidden = h_prev.shape[1]
    a = x @ Wx + h_prev @ Wh + b                        # 1. all gate pre-activations at once
    a_i, a_f, a_o, a_g = (a[:, k * hidden:(k + 1) * hidden] for k in range(4))  # 2. split
    i, f, o, g = sigmoid(a_i), sigmoid(a_f), sigmoid(a_o), np.tanh(a_g)        # 3. activations
    c = f * c_prev + i * g                              # 4. new cell state
    h = o * np.tanh(c)                                  # 5. new hidden state
    return h, c, StepCache(x, h_prev, c_prev, i, f, o, g, c, Wx, Wh)


def lstm_step_backward(dh: np.ndarray, dc: np.ndarray, cache: StepCache) -> dict[str, np.ndarray]:
    """Gradients of the loss w.r.t. ``x, h_prev, c_prev, Wx, Wh, b`` given ``dL/dh`` and ``dL/dc`` of this step.

    ``dc`` is the gradient arriving from the next step's cell state (zero at the last step).
    """
    x, h_prev, c_prev, i, f, o, g, c, Wx, Wh = cache
    tanh_c = np.tanh(c)
    # 5. h = o * tanh(c): to o, and to c (added to what arrives from the next step)
    do = tanh_c * dh
    dc = dc + o * (1.0 - tanh_c**2) * dh
    # 4. c = f * c_prev + i * g
    df, dc_prev, di, dg = c_prev * dc, f * dc, g * dc, i * dc
    # 3. through the non-linearities: sigmoid' = s (1 - s), tanh' = 1 - t^2
    da = np.hstack([i * (1 - i) * di, f * (1 - f) * df, o * (1 - o) * do, (1 - g**2) * dg])
    # 1. a = x Wx + h_prev Wh + b
    return {
        "x": da @ Wx.T,
        "h_prev": da @ Wh.T,
        "c_prev": dc_prev,
        "Wx": x.T @ da,
        "Wh": h_prev.T @ da,
        "b": da.sum(axis=0),
    }
