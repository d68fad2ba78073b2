"""Which packages the distribution installs, and under which names (metadata: setup.cfg).

``ncode_jax`` (the library) as it is; the training scripts of the folder ``train/`` under the name
``ncode_jax_train``, which cannot collide with another project's ``train``. From the repository
root ``python -m train.<script>`` runs the same code from the folder; installed, the console
scripts of setup.cfg (``ncode-train-toy``, ...) run it from anywhere. setup.cfg cannot rename a
package found by ``find:``, hence this file."""

from setuptools import find_packages, setup

TRAINING = "ncode_jax_train"

training = [TRAINING + name.removeprefix("train") for name in find_packages(include=["train", "train.*"])]
setup(packages=find_packages(include=["ncode_jax", "ncode_jax.*"]) + training,
      package_dir={TRAINING: "train"})
