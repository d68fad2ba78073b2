"""Griffe extension for the API reference: the docstrings' reStructuredText roles
(``:class:`~ncode_jax.NCODE```, ``:func:`solve```) become Markdown code spans (`NCODE`, `solve`),
which mkdocstrings renders as code instead of printing the role."""

import re

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj):`~?([^`]+)`")


def _short(target: str, tilde: bool) -> str:
    return target.rsplit(".", 1)[-1] if tilde else target


class RSTRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(lambda m: f"`{_short(m.group(1), '~' in m.group(0))}`",
                                            obj.docstring.value)
