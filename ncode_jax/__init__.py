"""ncode_jax — neurally-controlled neural ODEs (N-CODE) in JAX.

Vector fields whose weights θ are produced (open loop, θ(0) = γ(x(0))) and steered (closed loop,
dθ/dt = g(θ, x, t)) by a controller, solved with diffrax and differentiated by an adjoint.
"""

from .block import NCODEBlock
from .compiler import compiler_options
from .control import Feedback, Hypernetwork, StaticInit, augment
from .conv import ConvBlockField
from .dynamics import Dynamics, DynamicsArgs, State
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
from .solve import (
    STORED_STEPS_MAX_BYTES,
    Solution,
    SolveConfig,
    check_options,
    fixed_step_count,
    fixed_step_grid,
    nfe_count,
    solve,
    stored_steps_bytes,
)
from .solvers import RK4, SOLVERS

__version__ = "0.1.0"

__all__ = [
    "NCODE",
    "NCODEBlock",
    "RK4",
    "SOLVERS",
    "STORED_STEPS_MAX_BYTES",
    "CombinedCost",
    "ConvBlockField",
    "Dynamics",
    "DynamicsArgs",
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
    "fixed_step_count",
    "fixed_step_grid",
    "mlp_apply",
    "mlp_init",
    "nfe_count",
    "solve",
    "stored_steps_bytes",
]
