"""A stand-in for Colab's ``google.colab`` (tests only): put ``tests/fake_colab`` on the
notebook kernel's ``PYTHONPATH`` and the notebooks take their Colab branches. ``google`` stays
a namespace package (no ``google/__init__.py``), so ``google.protobuf`` still imports.

* ``drive.mount(path)`` creates ``path/MyDrive`` (a temporary folder standing in for Drive);
* ``files.upload()`` copies the file named by ``$FAKE_COLAB_UPLOAD`` into the working
  directory and returns ``{name: bytes}``, as the widget does;
* ``output`` records what the TensorBoard extension asks of it.
"""

from . import drive, files, output  # noqa: F401
