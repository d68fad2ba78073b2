"""The paper's toy problems (sec. 5.1), every problem and model: ``python -m train.toy`` reads this
file by default (``--problem``/``--model`` or ``--set problem=annuli`` pick a subset; ``--set``
any other key of ``train.toy.ToyConfig``). About 3.5 minutes on 2 CPU cores; the README's toy
table has the measured results (NODE cannot learn the reflection: MSE stays at 1/3)."""


def get_config() -> dict:
    return dict(problem="all", model="all")
