"""What every Gozon process shares: settings, database, logging, telemetry, metrics, HTTP basics."""
