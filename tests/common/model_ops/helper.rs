//! The helper thread: a second CPU's owner that stays idle unless told.

use std::sync::mpsc;

use lwbuf::{CpuGuard, Error, Lwbuf, Lwbufs};

pub(super) enum Cmd<'a> {
    Bind(usize),
    Unbind,
    Poll,
    Kva(Lwbuf<'a>),
    Drop(Lwbuf<'a>),
}

pub(super) enum Reply<'a> {
    Done(Result<(), Error>),
    Kva(Lwbuf<'a>, Result<Seen, Error>),
}

/// What an address read: its value and the first word of each page.
#[derive(Debug)]
pub(super) struct Seen {
    pub(super) addr: usize,
    pub(super) words: Vec<u64>,
}

pub(super) fn look(h: &Lwbuf<'_>, fs: usize) -> Result<Seen, Error> {
    let k = h.kva()?;
    let words = (0..h.pages().len()).map(|i| k.read_u64(i * fs)).collect::<Result<_, _>>()?;
    Ok(Seen { addr: k.addr(), words })
}

pub(super) fn helper<'a>(lw: &'a Lwbufs, fs: usize, rx: mpsc::Receiver<Cmd<'a>>, tx: mpsc::Sender<Reply<'a>>) {
    let mut guard: Option<CpuGuard<'a>> = None;
    for cmd in rx {
        let reply = match cmd {
            Cmd::Bind(cpu) => {
                drop(guard.take());
                Reply::Done(lw.bind(cpu).map(|g| guard = Some(g)))
            }
            Cmd::Unbind => {
                drop(guard.take());
                Reply::Done(Ok(()))
            }
            Cmd::Poll => Reply::Done(lw.poll()),
            Cmd::Kva(h) => {
                let r = look(&h, fs);
                Reply::Kva(h, r)
            }
            Cmd::Drop(h) => {
                drop(h);
                Reply::Done(Ok(()))
            }
        };
        if tx.send(reply).is_err() {
            return;
        }
    }
}
