"""Training entry points (``python -m train.<name>`` from the repository root; installed, the
package is ``ncode_jax_train`` and the scripts are the ``ncode-train-*`` commands) on one run
engine; :func:`load_run` opens any run. Modules import each other relatively, so both names work."""

from .engine import load_run  # noqa: F401
