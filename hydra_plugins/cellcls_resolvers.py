"""Registers cellcls's OmegaConf resolvers whenever Hydra starts.

Hydra imports every module under the `hydra_plugins` namespace package when it first composes a
config (to find its plugins), before any interpolation is resolved. Importing cellcls here
registers `${len:...}` and `${auto_precision:...}`, so `hydra.compose("train")` in a notebook
resolves cellcls configs without `import cellcls`. This module defines no plugin class.
"""

import cellcls  # noqa: F401  (registers the resolvers on import)
