"""Research on top of the audit: model zoos (:mod:`.zoo`), the offline demo (:mod:`.demo`), the flatness vs
generalisation study (:mod:`.study`) and its baseline measures (:mod:`.baselines`)."""
