"""The audit pipeline: one model's run (:mod:`.run`), an organisation's models (:mod:`.org`, on Ray:
:mod:`.ray_audit`), the results store (:mod:`.store`), reported accuracies (:mod:`.reported`), the leaderboard
(:mod:`.leaderboard`) and its rank statistics (:mod:`.ranks`). Settings: :class:`.options.AuditOptions`."""
