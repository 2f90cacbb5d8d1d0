//! Engine completions: where a transfer resubmits its remainder, a read-modify-write moves
//! from reading to writing, and requests finish.

use super::*;

impl Disk {
    pub(super) fn on_engine_completion(&mut self, c: EngineCompletion) {
        enum Action {
            Wait,
            Complete(Result<usize, BlockError>),
            Send(OpKind),
            FinishXfer,
            RmwWrite,
            SyncThen(usize),
            FinishSplit,
            Cow(io::Result<usize>),
        }
        let EngineCompletion { id, result } = c;
        let part = (id >> PART_SHIFT) as usize;
        let id = id & ID_MASK;
        let Some(entry) = self.inflight.get_mut(id) else {
            return;
        };
        let action = match &mut entry.state {
            State::Xfer {
                write,
                buf,
                host_off,
                total,
                done,
                dsync,
                ..
            } => match result {
                Err(e) => Action::Complete(Err(BlockError::Io(e))),
                Ok(n) => {
                    *done += n;
                    if *done >= *total {
                        Action::FinishXfer
                    } else if n == 0 && *write {
                        Action::Complete(Err(BlockError::Short {
                            what: "write",
                            done: *done,
                            len: *total,
                        }))
                    } else if n == 0 {
                        // End of file: the rest reads as zeroes (bounce buffers start zeroed).
                        if let XferBuf::Guest(sg) = buf {
                            sg.zero_from(*done);
                        }
                        Action::FinishXfer
                    } else {
                        let iovecs = buf.iovecs_after(*done);
                        let offset = *host_off + *done as u64;
                        Action::Send(OpKind::transfer(*write, offset, iovecs, *dsync))
                    }
                }
            },
            State::Split {
                parts,
                pending,
                short,
                err,
                ..
            } => {
                *pending -= 1;
                match result {
                    Err(e) => {
                        err.get_or_insert(BlockError::Io(e));
                    }
                    Ok(n) if Some(n) != parts.get(part).map(|p| p.len) => *short = true,
                    Ok(_) => {}
                }
                if *pending > 0 {
                    Action::Wait
                } else {
                    Action::FinishSplit
                }
            }
            State::RmwRead { pending, err, .. } => {
                *pending -= 1;
                if let Err(e) = result {
                    err.get_or_insert(e);
                }
                // Short reads leave zeroes (end of file), which is what the block holds.
                if *pending > 0 {
                    Action::Wait
                } else if let Some(e) = err.take() {
                    Action::Complete(Err(BlockError::Io(e)))
                } else {
                    Action::RmwWrite
                }
            }
            State::Sync { result: bytes } => {
                Action::Complete(result.map(|_| *bytes).map_err(BlockError::Io))
            }
            State::Falloc {
                len,
                advisory,
                sync_after,
            } => match result {
                Err(e) if *advisory && e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    Action::Complete(Ok(*len))
                }
                Err(e) => Action::Complete(Err(BlockError::Io(e))),
                Ok(_) if *sync_after => Action::SyncThen(*len),
                Ok(_) => Action::Complete(Ok(*len)),
            },
            State::Cow(_) => Action::Cow(result),
            State::Waiting(_) => {
                log::error!("engine completion for a request still waiting for its lock");
                Action::Wait
            }
        };
        match action {
            Action::Wait => {}
            Action::Complete(r) => self.complete(id, r),
            Action::Send(kind) => {
                self.send(id, kind);
            }
            Action::FinishXfer => self.finish_xfer(id),
            Action::FinishSplit => self.finish_split(id),
            Action::Cow(r) => self.on_cow_completion(id, part, r),
            Action::SyncThen(len) => {
                self.set_state(id, State::Sync { result: len });
                self.send(id, OpKind::Fdatasync);
            }
            Action::RmwWrite => {
                let Some(State::RmwRead {
                    sg,
                    mut buf,
                    host_off,
                    skip,
                    ..
                }) = self.take_state(id)
                else {
                    return;
                };
                let len = sg.len();
                sg.copy_to(0, &mut buf.as_mut_slice()[skip..skip + len]);
                let total = buf.len();
                self.begin_xfer(
                    id,
                    true,
                    XferBuf::Bounce(buf),
                    host_off,
                    total,
                    Then::Complete(len),
                    Some(sg),
                );
            }
        }
    }

    fn finish_split(&mut self, id: u64) {
        let Some(State::Split {
            write,
            sg,
            offset,
            short,
            err,
            ..
        }) = self.take_state(id)
        else {
            return;
        };
        match (err, short) {
            (Some(e), _) => self.complete(id, Err(e)),
            (None, true) => self.sync_path(id, offset, sg, write),
            (None, false) => self.complete(id, Ok(sg.len())),
        }
    }

    fn finish_xfer(&mut self, id: u64) {
        let Some(State::Xfer { buf, then, .. }) = self.take_state(id) else {
            return;
        };
        match then {
            Then::Complete(n) => self.complete(id, Ok(n)),
            Then::CopyOut { sg, skip, len } => {
                if let XferBuf::Bounce(b) = &buf {
                    sg.copy_from(0, &b.as_slice()[skip..skip + len]);
                }
                self.complete(id, Ok(len));
            }
        }
    }
}
