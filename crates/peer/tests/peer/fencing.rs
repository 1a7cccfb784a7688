//! Generation fencing end to end: a newer attachment fences an older one on the replica,
//! over the peer protocol and on the local path alike.

use bw_types::{Generation, IoError, IoReply};
use peer::PeerState;
use peer_proto::RefuseCode;

use crate::harness::*;

// Goal: client A (generation 5) writes; client B connects with generation 6; A's next
// request gets Fenced, A stops, and nothing A sends afterwards lands (checked by reading
// through B).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_generation_fences_older_client() {
    let server = Server::start().await;
    let a = server.connect(5).await;
    let mut a_state = a.subscribe();
    assert_eq!(write(&a, 0, vec![b'A'; 4096]).await, Ok(IoReply::Done));

    let b = server.connect(6).await;
    assert_eq!(server.replica.highest(), Generation(6));

    let err = write(&a, 0, vec![b'a'; 4096]).await.unwrap_err();
    assert!(
        matches!(&err, IoError::Faulted(m) if m.starts_with("fenced: generation 5 < 6")),
        "{err:?}"
    );
    a_state
        .wait_for(|s| {
            *s == PeerState::Fenced {
                highest: Generation(6),
            }
        })
        .await
        .unwrap();
    // Everything later fails at once, without reaching the peer.
    let later = write(&a, 4096, vec![b'a'; 4096]).await.unwrap_err();
    assert!(matches!(later, IoError::Faulted(_)), "{later:?}");

    assert_filled(&read(&b, 0, 4096).await, b'A');
    assert_filled(&read(&b, 4096, 4096).await, 0);
    assert_eq!(write(&b, 4096, vec![b'B'; 4096]).await, Ok(IoReply::Done));
    wait_until("the fenced connection counted", || async {
        server
            .stats
            .fenced_total
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    })
    .await;
}

// Goal: an older generation is refused at the handshake with the replica's highest, and a
// restart of the replica (reopen) keeps refusing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_generation_refused_at_handshake() {
    let server = Server::start().await;
    let _b = server.connect(9).await;
    let err = server
        .connect_with(8, Default::default())
        .await
        .unwrap_err();
    assert!(err.is_fenced(), "{err}");
    match err {
        peer::ConnectError::Refused {
            code,
            highest,
            message,
            ..
        } => {
            assert_eq!(
                (code, highest),
                (RefuseCode::StaleGeneration, Generation(9))
            );
            assert!(message.contains("fenced: generation 8 < 9"), "{message}");
        }
        other => panic!("{other}"),
    }
}

// Goal: the fence covers this node's local attachment too: a remote client with a newer
// generation fences the local device of an older one, and vice versa.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_and_remote_attachments_share_the_fence() {
    let server = Server::start().await;
    let local = server.replica.device_for(Generation(3)).unwrap();
    assert_eq!(write(&*local, 0, vec![3; 512]).await, Ok(IoReply::Done));
    let remote = server.connect(4).await;
    assert!(local.is_fenced());
    let err = write(&*local, 0, vec![9; 512]).await.unwrap_err();
    assert_eq!(err, IoError::Faulted("fenced: generation 3 < 4".into()));
    assert_eq!(&read(&remote, 0, 512).await, &vec![3u8; 512]);

    let local5 = server.replica.device_for(Generation(5)).unwrap();
    assert!(matches!(
        write(&remote, 0, vec![4; 512]).await,
        Err(IoError::Faulted(_))
    ));
    assert_eq!(write(&*local5, 0, vec![5; 512]).await, Ok(IoReply::Done));
}
