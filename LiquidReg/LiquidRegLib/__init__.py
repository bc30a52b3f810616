"""LiquidReg engine: fast diffeomorphic learned registration of 3D medical images.

Importable without Slicer.  Modules, one job each: ``grid`` (geometry), ``io`` (files),
``diffeo`` (velocity fields -> diffeomorphisms), ``affine`` (pre-alignment), ``model`` (network),
``losses``, ``train`` (the stabilised loop), ``register`` (the pipeline), ``logic`` (MRML),
``cli`` (the ``liquidreg`` command), ``data`` (training material).
"""
__version__ = "0.1.0"
