"""The LSTM equations, each with a label, and the kernels that compute them.

Every equation is written here once, as LaTeX, under a stable label. Kernels declare the
labels they compute with :func:`implements`; the registry :data:`KERNELS` collects them so
that documentation and tests can map each kernel to its equations and cannot drift from
the code.

The gate layout of the stacked weights is fixed by :data:`GATES`: the rows of
``weight_ih``, ``weight_hh``, ``bias_ih`` and ``bias_hh`` hold the four gates in the order
i, f, g, o (as in PyTorch, cuDNN's ``torch.nn.LSTM`` wrapper and oneDNN).
"""

from __future__ import annotations

from typing import NamedTuple


class Gate(NamedTuple):
    """One block of the stacked gate weights."""

    symbol: str
    name: str
    tutorial: str
    activation: str


#: The four gate blocks, in the order they are stacked in ``weight_ih``/``weight_hh``.
GATES: tuple[Gate, ...] = (
    Gate("i", "input gate", "learn gate: the ignore factor", "sigmoid"),
    Gate("f", "forget gate", "forget gate: the forget factor", "sigmoid"),
    Gate("g", "cell candidate", "learn gate: the candidate memory", "tanh"),
    Gate("o", "output gate", "use gate: the output factor", "sigmoid"),
)


class Equation(NamedTuple):
    """A labelled equation: its LaTeX and a short description."""

    latex: str
    description: str


#: Every equation the kernels compute, by label. Symbols: x_t the input (the event),
#: h_t the hidden state (short-term memory), c_t the cell state (long-term memory),
#: a_t = [a^i, a^f, a^g, a^o] the gate pre-activations, δ the gradient of the loss.
EQUATIONS: dict[str, Equation] = {
    # Forward.
    "input-projection": Equation(
        r"a^x_t = W_{ih} x_t + b_{ih} + b_{hh} \quad \text{for all } t",
        "the input term of every gate, for all steps at once (one GEMM)",
    ),
    "recurrent-projection": Equation(
        r"a_t = a^x_t + W_{hh} h_{t-1}",
        "the recurrent term, added at each step",
    ),
    "input-gate": Equation(
        r"i_t = \sigma(a^i_t)",
        "learn gate, ignore factor: how much of the candidate to learn",
    ),
    "forget-gate": Equation(
        r"f_t = \sigma(a^f_t)",
        "forget gate: how much of the long-term memory to keep",
    ),
    "cell-candidate": Equation(
        r"g_t = \tanh(a^g_t)",
        "learn gate, candidate: new memory built from the event and the short-term memory",
    ),
    "output-gate": Equation(
        r"o_t = \sigma(a^o_t)",
        "use gate: how much of the memory to output",
    ),
    "cell-update": Equation(
        r"c_t = f_t \odot c_{t-1} + i_t \odot g_t",
        "remember gate: the new long-term memory",
    ),
    "hidden-update": Equation(
        r"h_t = o_t \odot \tanh(c_t)",
        "use gate output: the new short-term memory",
    ),
    "projection": Equation(
        r"h_t = W_{hr} \left(o_t \odot \tanh(c_t)\right)",
        "with proj_size > 0: the short-term memory is projected to proj_size units",
    ),
    "padding": Equation(
        r"h_t = h_{t-1},\ c_t = c_{t-1},\ y_t = 0 \quad \text{for steps beyond the length}",
        "padded steps carry the state unchanged and output zeros",
    ),
    # Forward, peephole cell (cell="peephole"): p = [p_i; p_f; p_o], one row per gate.
    "peephole-input-gate": Equation(
        r"i_t = \sigma(a^i_t + p_i \odot c_{t-1})",
        "peephole: the ignore factor also sees the old long-term memory",
    ),
    "peephole-forget-gate": Equation(
        r"f_t = \sigma(a^f_t + p_f \odot c_{t-1})",
        "peephole: the forget factor also sees the old long-term memory",
    ),
    "peephole-output-gate": Equation(
        r"o_t = \sigma(a^o_t + p_o \odot c_t)",
        "peephole: the use gate also sees the new long-term memory",
    ),
    # Forward, the tutorial's LTM/STM cell (cell="ltm_stm"): the o block is its V gate.
    "kept-memory": Equation(
        r"m_t = f_t \odot c_{t-1}",
        "LTM/STM: the forget gate's output, the long-term memory kept",
    ),
    "use-layer": Equation(
        r"U_t = \tanh(W_u m_t + b_u)",
        "LTM/STM: the use gate's own layer reads the kept memory (one product per step)",
    ),
    "use-gate-output": Equation(
        r"h_t = U_t \odot o_t",
        "LTM/STM: the new short-term memory, STM_t = U_t V_t with V_t = o_t",
    ),
    # Backward.
    "d-hidden": Equation(
        r"\delta h_t = \delta y_t + W_{hh}^\top \delta a_{t+1}",
        "gradient at the short-term memory: from the output and from the next step",
    ),
    "d-projection": Equation(
        r"\delta r_t = W_{hr}^\top \delta h_t",
        "gradient through the projection, with proj_size > 0",
    ),
    "d-output-gate": Equation(
        r"\delta a^o_t = \delta r_t \odot \tanh(c_t) \odot o_t (1 - o_t)",
        "gradient at the use gate's pre-activation",
    ),
    "d-cell": Equation(
        r"\delta c_t = \delta c_{t+1} \odot f_{t+1}"
        r" + \delta r_t \odot o_t \odot (1 - \tanh^2(c_t))",
        "gradient at the long-term memory, carried back through time",
    ),
    "d-input-gate": Equation(
        r"\delta a^i_t = \delta c_t \odot g_t \odot i_t (1 - i_t)",
        "gradient at the ignore factor's pre-activation",
    ),
    "d-forget-gate": Equation(
        r"\delta a^f_t = \delta c_t \odot c_{t-1} \odot f_t (1 - f_t)",
        "gradient at the forget gate's pre-activation",
    ),
    "d-cell-candidate": Equation(
        r"\delta a^g_t = \delta c_t \odot i_t \odot (1 - g_t^2)",
        "gradient at the candidate's pre-activation",
    ),
    "d-input": Equation(
        r"\delta x_t = W_{ih}^\top \delta a_t",
        "gradient at the input (the event), for all steps at once (one GEMM)",
    ),
    "d-weights": Equation(
        r"\delta W_{ih} = \sum_t \delta a_t x_t^\top,\ "
        r"\delta W_{hh} = \sum_t \delta a_t h_{t-1}^\top,\ "
        r"\delta b_{ih} = \delta b_{hh} = \sum_t \delta a_t",
        "parameter gradients, each one GEMM over all steps",
    ),
    "d-projection-weights": Equation(
        r"\delta W_{hr} = \sum_t \delta h_t \left(o_t \odot \tanh(c_t)\right)^\top",
        "gradient of the projection weights, one GEMM over all steps",
    ),
    "d-initial-state": Equation(
        r"\delta h_0 = W_{hh}^\top \delta a_1,\ \delta c_0 = \delta c_1 \odot f_1",
        "gradients at the initial states",
    ),
    # Backward, peephole cell.
    "d-peephole-cell": Equation(
        r"\delta c_t = \delta c_{t+1} \odot f_{t+1} + p_i \odot \delta a^i_{t+1}"
        r" + p_f \odot \delta a^f_{t+1}"
        r" + \delta r_t \odot o_t \odot (1 - \tanh^2(c_t)) + p_o \odot \delta a^o_t",
        "peephole: the long-term memory's gradient also flows back through the peepholes",
    ),
    "d-peephole-weights": Equation(
        r"\delta p_i = \sum_t \delta a^i_t \odot c_{t-1},\ "
        r"\delta p_f = \sum_t \delta a^f_t \odot c_{t-1},\ "
        r"\delta p_o = \sum_t \delta a^o_t \odot c_t",
        "peephole: gradients of the peephole weights, sums over all steps",
    ),
    # Backward, LTM/STM cell.
    "d-use-gate": Equation(
        r"\delta a^u_t = \delta h_t \odot o_t \odot (1 - U_t^2)",
        "LTM/STM: gradient at the use layer's pre-activation",
    ),
    "d-use-layer": Equation(
        r"\delta a^o_t = \delta h_t \odot U_t \odot o_t (1 - o_t)",
        "LTM/STM: gradient at the V gate's pre-activation",
    ),
    "d-kept-memory": Equation(
        r"\delta m_t = W_u^\top \delta a^u_t",
        "LTM/STM: gradient at the kept memory, through the use layer (one product per step)",
    ),
    "d-ltm-stm-cell": Equation(
        r"\delta c_t = (\delta c_{t+1} + \delta m_{t+1}) \odot f_{t+1}",
        "LTM/STM: the long-term memory feeds only the next step",
    ),
    "d-ltm-stm-forget-gate": Equation(
        r"\delta a^f_t = (\delta c_t + \delta m_t) \odot c_{t-1} \odot f_t (1 - f_t)",
        "LTM/STM: the forget gate also feeds the use layer",
    ),
    "d-use-weights": Equation(
        r"\delta W_u = \sum_t \delta a^u_t m_t^\top,\ \delta b_u = \sum_t \delta a^u_t",
        "LTM/STM: gradients of the use layer, one GEMM over all steps",
    ),
}


class Kernel(NamedTuple):
    """A compiled kernel and the equations it computes."""

    name: str
    backend: str
    function: object
    equations: tuple[str, ...]


#: Every kernel that declared its equations with :func:`implements`, in import order.
KERNELS: list[Kernel] = []


def implements(*labels: str, backend: str):
    """Declare that the decorated kernel computes the equations named by ``labels``.

    Parameters
    ----------
    *labels : str
        Keys of :data:`EQUATIONS`.
    backend : str
        The backend the kernel belongs to (``"cpu"`` or ``"cuda"``), or ``"shared"`` for
        the gate functions that both backends compile.

    Returns
    -------
    callable
        A decorator that records the kernel in :data:`KERNELS`, sets its ``equations``
        attribute and returns it unchanged.
    """
    unknown = [label for label in labels if label not in EQUATIONS]
    if unknown or not labels:
        raise ValueError(f"implements() needs labels from EQUATIONS, got unknown {unknown!r}")

    def register(kernel):
        name = getattr(kernel, "__name__", None) or kernel.py_func.__name__
        kernel.equations = labels
        KERNELS.append(Kernel(name, backend, kernel, labels))
        return kernel

    return register
