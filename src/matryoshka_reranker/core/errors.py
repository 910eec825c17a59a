"""One small exception hierarchy; the CLI maps it to exit codes by meaning.

* ``InputError`` (exit 2): bad input or configuration: a params key, a training line, a model
  folder that is not one, an input format that disagrees. Fix the input and rerun.
* ``CheckFailed`` (exit 1): the input was fine but a check said no: data validation, an export's
  parity, a model folder that does not match its manifest, the release gate.
* Anything else raised as ``MatryoshkaError`` (exit 1) is a refused or failed operation (a
  release that cannot be published, a download that cannot be verified).

The subclasses also derive from the built-in type callers already catch (``ValueError``,
``RuntimeError``), so ``except ValueError`` keeps working around configuration errors.
"""

from __future__ import annotations


class MatryoshkaError(Exception):
    """Base of every error this package raises on purpose."""

    exit_code = 1


class InputError(MatryoshkaError, ValueError):
    """Bad input or configuration (exit code 2)."""

    exit_code = 2


class CheckFailed(MatryoshkaError, RuntimeError):
    """A check failed: validation, parity, integrity, the gate (exit code 1)."""

    exit_code = 1
