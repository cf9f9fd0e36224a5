"""Methods: one module each, registered by name. Importing this package registers them all."""
from methods import baselines, glnet, isdnet, rue, uhrsnet  # noqa: F401  (importing a method module registers it)
from methods.base import (  # noqa: F401
    MethodError,
    Phase,
    UHRMethod,
    build_method,
    count_parameters,
    display_name,
    list_methods,
    method_class,
    register_method,
    resolve_method_name,
)
