"""Serve ``wildactor_kernels.model`` from a source checkout that is not installed."""

import importlib.abc as _abc
import importlib.util as _util
import os as _os
import sys as _sys


# An installed copy (wheel) holds the model package at wildactor_kernels/model/, and an editable
# install maps it there through setuptools' package_dir. A source checkout run without
# installing (PYTHONPATH=., e.g. on a machine without a registry) keeps it in model/ beside this
# package: this finder serves exactly that one name from the checkout this package was imported
# from, so a second checkout never picks up another's model code, and no top-level ``model``
# name is ever created.
class _CheckoutModelFinder(_abc.MetaPathFinder):
    name = "wildactor_kernels.model"

    def __init__(self, model_dir: str):
        self.model_dir = model_dir

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        return _util.spec_from_file_location(fullname, _os.path.join(self.model_dir, "__init__.py"),
                                             submodule_search_locations=[self.model_dir])


def install_checkout_finder() -> None:
    here = _os.path.dirname(_os.path.abspath(__file__))
    if _os.path.isfile(_os.path.join(here, "model", "__init__.py")):
        return  # installed layout: the subpackage sits inside this package
    model_dir = _os.path.join(_os.path.dirname(here), "model")
    if not (_os.path.isfile(_os.path.join(model_dir, "__init__.py"))
            and _os.path.isfile(_os.path.join(_os.path.dirname(here), "setup.py"))):
        return
    # one finder at most, also across a reload of the package (a new class object)
    _sys.meta_path[:] = [f for f in _sys.meta_path if type(f).__name__ != "_CheckoutModelFinder"]
    _sys.meta_path.insert(0, _CheckoutModelFinder(model_dir))


