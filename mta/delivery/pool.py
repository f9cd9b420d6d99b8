"""The delivery pool: MTA_DELIVERY_WORKERS threads, and what one attempt does.

A worker takes a due message from the `Scheduler`, locks it in the spool
(so `mta queue` waits instead of racing), expands aliases for local
recipients (the expansion is written to the envelope before any delivery,
keeping the original as ORCPT, like Postfix's virtual aliases), hands local
recipients to the local courier (Maildir or LMTP) and the others, grouped by
destination, to the SMTP client. Then it records each recipient's result,
queues DSNs (RFC 3464) for bounces, delay warnings and requested success
notices, and either removes the finished message or defers it with backoff.

Crash safety: results are written to the envelope (atomically) before the
message is removed or moved; a kill in the middle means the recipient is
retried after restart (at least once, never lost). A DSN is queued before
the envelope says the bounce happened, for the same reason.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time

from mta import metrics
from mta.address import AddressError, domain_key, parse_mailbox
from mta.delivery.result import DELIVERED, PERMANENT, Result
from mta.delivery.scheduler import Scheduler, backoff
from mta.spool.envelope import BOUNCED, DEFERRED, DELIVERED as RCPT_DELIVERED, Envelope, EnvelopeError, Recipient, parse_iso

log = logging.getLogger("mta.delivery")


def _iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).isoformat(timespec="seconds")


class Deliverer:
    """One delivery attempt of one message (called by worker threads)."""

    def __init__(self, context, scheduler: Scheduler, smtp_client, local_courier, clock=time.time):
        self.ctx = context            # SmtpContext: current config, aliases, users, spool
        self.scheduler = scheduler
        self.smtp_client = smtp_client
        self.local_courier = local_courier
        self.clock = clock

    @property
    def config(self):
        return self.ctx.config

    @property
    def spool(self):
        return self.ctx.spool

    def process(self, queue_id: str) -> None:
        entry = self.spool.find(queue_id)
        if entry is None or entry.state not in ("incoming", "deferred"):
            return
        lock = self.spool.try_lock(entry)
        if lock is None:
            return   # an operator command holds it; the next scan brings it back
        with lock:
            try:
                envelope = self.spool.load(entry)
            except (OSError, EnvelopeError) as error:
                self.spool.quarantine(entry, str(error))
                return
            now = self.clock()
            if entry.state == "deferred" and envelope.next_attempt:
                due = parse_iso(envelope.next_attempt).timestamp()
                if due > now + 1:
                    self.scheduler.defer(queue_id, due)
                    return
            log.info("%s: from=<%s>, size=%d, nrcpt=%d (queue active)", queue_id, envelope.sender,
                     envelope.size, len(envelope.open_recipients))
            if self._expand_aliases(entry, envelope):
                self.spool.write_envelope(entry, envelope)
            results = self._attempt(entry, envelope)
            self._record(entry, envelope, results)

    # --- routing ---

    def _is_local(self, address: str) -> bool:
        return domain_key(address.rpartition("@")[2]) in self.config.all_local_domains

    def _expand_aliases(self, entry, envelope: Envelope) -> bool:
        aliases = self.ctx.aliases
        changed = False
        new_list: list[Recipient] = []
        seen = {r.address.lower() for r in envelope.recipients if not r.is_open}
        for recipient in envelope.recipients:
            if not recipient.is_open or not self._is_local(recipient.address):
                new_list.append(recipient)
                seen.add(recipient.address.lower())
                continue
            try:
                key = parse_mailbox(recipient.address).key
            except AddressError:
                new_list.append(recipient)
                continue
            targets = aliases.expand(key)
            if targets == [key]:
                new_list.append(recipient)
                seen.add(key)
                continue
            changed = True
            log.info("%s: to=<%s>, status=expanded (alias of %s)", entry.id, ", ".join(targets), recipient.address)
            for target in targets:
                if target in seen:
                    continue
                seen.add(target)
                new_list.append(Recipient(address=target, orcpt=recipient.orcpt or f"rfc822;{recipient.address}",
                                          notify=recipient.notify, attempts=recipient.attempts))
        if changed:
            envelope.recipients = new_list
        return changed

    def _local_mailbox_exists(self, address: str) -> bool:
        key = parse_mailbox(address).key
        return key.rpartition("@")[0] == "postmaster" or self.ctx.users.exists(key)

    def _attempt(self, entry, envelope: Envelope) -> dict[str, tuple[Recipient, Result]]:
        open_recipients = envelope.open_recipients
        results: dict[str, tuple[Recipient, Result]] = {}
        local: list[Recipient] = []
        remote: dict[str, list[Recipient]] = {}
        for recipient in open_recipients:
            if self._is_local(recipient.address):
                try:
                    exists = self._local_mailbox_exists(recipient.address)
                except AddressError:
                    exists = False
                if exists:
                    local.append(recipient)
                else:
                    results[recipient.address] = (recipient, Result.permanent(
                        "5.1.1", f"unknown user: \"{recipient.address}\"", "local"))
            else:
                key = "" if self.config.relayhost else domain_key(recipient.address.rpartition("@")[2])
                remote.setdefault(key, []).append(recipient)
        if local:
            by_key = {parse_mailbox(r.address).key: r for r in local}
            try:
                outcome = self.local_courier.deliver(envelope, entry.message_path, list(by_key))
            except Exception as error:   # a courier bug must defer, not lose mail
                log.exception("%s: local delivery failed", entry.id)
                outcome = {}
            for key, recipient in by_key.items():
                result = outcome.get(key) or Result.temporary("4.3.0", "local delivery error, see mta.log")
                results[recipient.address] = (recipient, result)
        for domain, recipients in remote.items():
            try:
                outcome = self.smtp_client.deliver(envelope, entry.message_path, self._size(entry, envelope),
                                                   domain, recipients)
            except Exception as error:
                log.exception("%s: SMTP delivery failed", entry.id)
                outcome = {r.address: Result.temporary("4.3.0", f"delivery error: {error}") for r in recipients}
            for recipient in recipients:
                results[recipient.address] = (recipient, outcome[recipient.address])
        return results

    def _size(self, entry, envelope: Envelope) -> int:
        import os
        try:
            return os.path.getsize(entry.message_path)
        except OSError:
            return envelope.size

    # --- outcomes ---

    def _record(self, entry, envelope: Envelope, results: dict[str, tuple[Recipient, Result]]) -> None:
        now = self.clock()
        arrival = parse_iso(envelope.arrival).timestamp()
        age = now - arrival
        expired = age >= self.config.max_queue_age
        bounced: list[tuple[Recipient, Result]] = []
        delayed: list[tuple[Recipient, Result]] = []
        succeeded: list[tuple[Recipient, Result]] = []
        for recipient, result in results.values():
            recipient.attempts += 1
            recipient.remote_mta = result.remote_mta
            recipient.dsn_status = result.dsn
            status_word = result.status_word
            if result.kind == DELIVERED:
                recipient.status = RCPT_DELIVERED
                recipient.last_error = None
                recipient.finished_at = _iso(now)
                metrics.DELIVERY_DURATION.observe(max(0.0, age))
                succeeded.append((recipient, result))
            elif result.kind == PERMANENT or expired:
                if result.kind != PERMANENT:
                    status_word = "expired"
                    result = Result.permanent("4.4.7", f"message expired after {int(age)}s in the queue; "
                                              f"last error: {result.text}", result.remote_mta, result.diagnostic)
                    recipient.dsn_status = "4.4.7"
                recipient.status = BOUNCED
                recipient.last_error = result.text
                recipient.finished_at = _iso(now)
                bounced.append((recipient, result))
            else:
                recipient.status = DEFERRED
                recipient.last_error = result.text
                if self.config.delay_warning_time and age >= self.config.delay_warning_time \
                        and not recipient.delay_notified:
                    delayed.append((recipient, result))
            metrics.DELIVERY_ATTEMPTS.labels(result=status_word).inc()
            log.info("%s: to=<%s>,%s relay=%s, delay=%.1f, dsn=%s, status=%s (%s)", entry.id, recipient.address,
                     f" orig_to=<{recipient.orcpt.partition(';')[2]}>," if recipient.orcpt else "",
                     result.remote_mta or "none", age, result.dsn, status_word, result.text)

        self._notify(entry, envelope, bounced, "failed")
        for recipient, _ in self._notify(entry, envelope, delayed, "delayed"):
            recipient.delay_notified = True
        self._notify(entry, envelope, succeeded, "delivered")

        if not envelope.open_recipients:
            # No final envelope first: a crash before the removal redelivers
            # either way (at least once, like Postfix), and it cost 2 fsyncs.
            self.spool.remove(entry)
            log.info("%s: removed", entry.id)
            return
        envelope.attempts += 1
        due = now + backoff(envelope.attempts, self.config.backoff_min, self.config.backoff_max)
        envelope.next_attempt = _iso(due)
        self.spool.write_envelope(entry, envelope)
        self.spool.move(entry, "deferred")
        self.scheduler.defer(entry.id, due)

    def _notify(self, entry, envelope: Envelope, items, action: str):
        """Queue one DSN for `items` (those whose NOTIFY asks for it); returns them."""
        from mta.delivery import dsn
        if not items or dsn.dsn_recipient(envelope) is None:
            return []
        wanted = [(r, res) for r, res in items if dsn.should_notify(r, action)]
        if not wanted:
            return []
        try:
            arrival = parse_iso(envelope.arrival)
            data = dsn.build_dsn(envelope, wanted, action, reporting_mta=self.config.hostname,
                                 message_path=entry.message_path,
                                 retry_until=arrival + datetime.timedelta(seconds=self.config.max_queue_age))
            notice = Envelope(id="", sender="", recipients=[Recipient(address=dsn.dsn_recipient(envelope))],
                              smtputf8=envelope.smtputf8, body=dsn.body_type(data), protocol="local")
            queued = self.spool.inject(data, notice)
        except (OSError, ValueError) as error:
            log.error("%s: cannot queue %s notification: %s", entry.id, action, error)
            return []
        metrics.DSNS_SENT.labels(action=action).inc()
        log.info("%s: sender %s notification: %s", entry.id,
                 {"failed": "non-delivery", "delayed": "delay", "delivered": "delivery"}[action], queued.id)
        return wanted


class DeliveryPool:
    """Worker threads feeding on the scheduler; stop() lets them finish."""

    def __init__(self, workers: int, scheduler: Scheduler, deliverer: Deliverer):
        self.scheduler = scheduler
        self.deliverer = deliverer
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._work, name=f"delivery-{n}", daemon=True)
                        for n in range(workers)]
        self.scanner = threading.Thread(target=scheduler.run_scanner, name="scheduler",
                                        args=(self.stop_event, deliverer.smtp_client.prune), daemon=True)

    def start(self) -> None:
        self.scheduler.scan()
        self.scanner.start()
        for thread in self.threads:
            thread.start()

    def _work(self) -> None:
        while not self.stop_event.is_set():
            queue_id = self.scheduler.get(timeout=1.0)
            if queue_id is None:
                continue
            try:
                self.deliverer.process(queue_id)
            except Exception:
                # Unexpected: leave the message where it is; it will be rescanned.
                log.exception("%s: delivery attempt failed unexpectedly", queue_id)
            finally:
                self.scheduler.done(queue_id)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM: no new attempts; running ones finish within `grace` or are
        abandoned (their envelopes are unchanged, so they are retried later)."""
        self.stop_event.set()
        self.scheduler.stop()
        deadline = time.monotonic() + grace
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.deliverer.smtp_client.close_all()
