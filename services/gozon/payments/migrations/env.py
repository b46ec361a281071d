from gozon.core.migrations import run_env
from gozon.payments.models import Base

run_env(Base.metadata)
