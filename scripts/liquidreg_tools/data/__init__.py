"""Training material: real brains from pip packages, a shared label scheme, image synthesis from
label maps, random deformations and the pair sampler (see DATA.md).

Modules, one job each: ``sources`` (pinned wheels, provenance), ``volumes`` (reading sources,
the RAS 1 mm standard form), ``labels`` (the shared scheme and each source's mapping),
``subjects`` (one builder per source, the train/test split), ``propagate`` (completing the
donors' partial label maps), ``fetch`` (the data folder and its manifest), ``sample`` (the
shipped sample pair), ``synth`` (contrast synthesis and augmentation), ``deform`` (random
diffeomorphisms), ``pairs`` (the training-pair sampler).
"""
