"""LiquidReg engine: fast diffeomorphic learned registration of 3D medical images.

Importable without Slicer.  Modules, one job each: ``options`` (how to register), ``grid``
(geometry), ``io`` (files), ``results`` (a result folder), ``resources`` (the shipped weights
and sample pair), ``validate``, ``memory``, ``diffeo`` (velocity fields -> diffeomorphisms),
``affine`` (pre-alignment), ``model`` (network), ``losses``, ``train`` (the stabilised loop),
``register`` (the pipeline), ``logic`` (MRML), ``cli`` (the ``liquidreg`` command).  The
training and benchmark tooling lives apart, in ``scripts/liquidreg_tools``.
"""
__version__ = "0.1.0"
