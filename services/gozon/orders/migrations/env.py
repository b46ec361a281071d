from gozon.core.migrations import run_env
from gozon.orders.models import Base

run_env(Base.metadata)
