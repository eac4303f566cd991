"Self-rewarding methods: the registry (`registry`), DICE length control (`length`) and the methods registered in modules of their own, imported here so that any use of the package knows them."
from . import scpo, meta, temporal  # register 'scpo', 'meta-rewarding' and 'temporal' with the registry
