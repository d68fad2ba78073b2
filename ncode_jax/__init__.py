"""ncode_jax — neurally-controlled neural ODEs (N-CODE) in JAX.

Vector fields whose weights θ are produced (open loop, θ(0) = γ(x(0))) and steered (closed loop,
dθ/dt = g(θ, x, t)) by a controller, solved with diffrax and differentiated by an adjoint.
"""

from .block import NCODEBlock
from .compiler import compiler_options
from .control import Feedback, Hypernetwork, StaticInit, augment
from .conv import ConvBlockField
from .dynamics import Dynamics, State
from .fields import LinearField, MLPField, SparseLinearField, VectorField, dense
from .layout import ParamLayout, ParamSpec
from .module_field import ModuleField, ModuleLayout
from .ncode import NCODE
from .nn import mlp_apply, mlp_init
from .regularizers import (
    CombinedCost,
    JacobianFrobenius,
    KineticEnergy,
    combine,
    jacobian_frobenius,
    kinetic_energy,
    regularization,
    regularizer_args,
)
from .solve import Solution, SolveConfig, check_options, nfe_count, solve
from .solvers import RK4, SOLVERS

__version__ = "0.1.0"

__all__ = [
    "NCODE",
    "NCODEBlock",
    "RK4",
    "SOLVERS",
    "CombinedCost",
    "ConvBlockField",
    "Dynamics",
    "Feedback",
    "Hypernetwork",
    "JacobianFrobenius",
    "KineticEnergy",
    "LinearField",
    "MLPField",
    "ModuleField",
    "ModuleLayout",
    "ParamLayout",
    "ParamSpec",
    "Solution",
    "SolveConfig",
    "SparseLinearField",
    "State",
    "StaticInit",
    "VectorField",
    "augment",
    "combine",
    "jacobian_frobenius",
    "kinetic_energy",
    "regularization",
    "regularizer_args",
    "check_options",
    "compiler_options",
    "dense",
    "mlp_apply",
    "mlp_init",
    "nfe_count",
    "solve",
]
