"""ncode_jax — neurally-controlled neural ODEs (N-CODE) in JAX.

Vector fields whose weights θ are produced (open loop, θ(0) = γ(x(0))) and steered (closed loop,
dθ/dt = g(θ, x, t)) by a controller, solved with diffrax and differentiated by an adjoint.
"""

from .control import Feedback, Hypernetwork, StaticInit, augment
from .conv import ConvBlockField
from .dynamics import Dynamics, State
from .fields import LinearField, MLPField, SparseLinearField, VectorField, dense
from .layout import ParamLayout, ParamSpec
from .ncode import NCODE
from .nn import mlp_apply, mlp_init
from .solve import Solution, SolveConfig, check_options, nfe_count, solve
from .solvers import RK4, SOLVERS

__version__ = "0.1.0"

__all__ = [
    "NCODE",
    "RK4",
    "SOLVERS",
    "ConvBlockField",
    "Dynamics",
    "Feedback",
    "Hypernetwork",
    "LinearField",
    "MLPField",
    "ParamLayout",
    "ParamSpec",
    "Solution",
    "SolveConfig",
    "SparseLinearField",
    "State",
    "StaticInit",
    "VectorField",
    "augment",
    "check_options",
    "dense",
    "mlp_apply",
    "mlp_init",
    "nfe_count",
    "solve",
]
